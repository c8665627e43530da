"""The client address: the reference's rule, and TRUSTED_PROXIES."""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from llmproxy.config import Config, ConfigError
from llmproxy.web.clientip import TrustedProxies
from llmproxy.web.site import LLMProxySite, client_ip


def request(peer: object, **headers: str) -> DummyRequest:
    r = DummyRequest([b""])
    r.client = peer
    for name, value in headers.items():
        r.requestHeaders.addRawHeader(name.replace("_", "-").encode(), value.encode())
    return r


def tcp(host: str) -> IPv4Address:
    return IPv4Address("TCP", host, 40000)


class ReferenceRuleTests(SynchronousTestCase):
    """Without TRUSTED_PROXIES: first X-Forwarded-For entry, X-Real-IP, peer."""

    def test_order(self) -> None:
        both = request(tcp("10.0.0.1"), x_forwarded_for="1.2.3.4, 10.0.0.9", x_real_ip="5.6.7.8")
        self.assertEqual(client_ip(both), "1.2.3.4")
        self.assertEqual(client_ip(request(tcp("10.0.0.1"), x_real_ip=" 5.6.7.8 ")), "5.6.7.8")
        self.assertEqual(client_ip(request(tcp("10.0.0.1"))), "10.0.0.1")


class TrustedProxiesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.trusted = TrustedProxies(["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"])

    def client(self, peer: object, **headers: str) -> str:
        return self.trusted.client_of(request(peer, **headers))

    def test_untrusted_peer_is_the_client(self) -> None:
        self.assertEqual(
            self.client(tcp("203.0.113.1"), x_forwarded_for="1.2.3.4", x_real_ip="5.6.7.8"),
            "203.0.113.1",
        )

    def test_nearest_untrusted_hop(self) -> None:
        # The client wrote "6.6.6.6"; the proxies appended what they saw.
        xff = "6.6.6.6, 198.51.100.4, 10.1.1.1"
        self.assertEqual(self.client(tcp("10.2.2.2"), x_forwarded_for=xff), "198.51.100.4")
        self.assertEqual(self.client(tcp("192.0.2.7"), x_forwarded_for=xff), "198.51.100.4")

    def test_several_header_lines_read_in_order(self) -> None:
        r = request(tcp("10.2.2.2"))
        r.requestHeaders.setRawHeaders(b"x-forwarded-for", [b"6.6.6.6", b"198.51.100.4, 10.0.0.3"])
        self.assertEqual(self.trusted.client_of(r), "198.51.100.4")

    def test_all_hops_trusted(self) -> None:
        self.assertEqual(
            self.client(tcp("10.2.2.2"), x_forwarded_for="10.9.9.9, 10.1.1.1"), "10.9.9.9"
        )

    def test_real_ip_from_a_trusted_peer(self) -> None:
        self.assertEqual(self.client(tcp("10.2.2.2"), x_real_ip="198.51.100.9"), "198.51.100.9")
        self.assertEqual(self.client(tcp("10.2.2.2")), "10.2.2.2")

    def test_ipv6_and_mapped_ipv4(self) -> None:
        v6 = IPv6Address("TCP", "2001:db8::5", 40000)
        self.assertEqual(self.client(v6, x_forwarded_for="2001:db9::1"), "2001:db9::1")
        mapped = IPv6Address("TCP", "::ffff:10.0.0.5", 40000)
        self.assertEqual(self.client(mapped, x_forwarded_for="198.51.100.4"), "198.51.100.4")

    def test_ports_some_proxies_add_are_dropped(self) -> None:
        for xff, client in (
            ("198.51.100.4:52113, 10.1.1.1:443", "198.51.100.4"),
            ("[2001:db9::1]:52113", "2001:db9::1"),
            ("2001:db9::1", "2001:db9::1"),
        ):
            self.assertEqual(self.client(tcp("10.2.2.2"), x_forwarded_for=xff), client, xff)

    def test_hop_that_is_not_an_address_is_not_trusted(self) -> None:
        self.assertEqual(
            self.client(tcp("10.2.2.2"), x_forwarded_for="198.51.100.4, unknown"), "unknown"
        )

    def test_unix_socket_peers(self) -> None:
        unix = UNIXAddress(None)
        self.assertEqual(self.client(unix, x_forwarded_for="198.51.100.4"), "")
        trusted = TrustedProxies(["unix"])
        self.assertEqual(
            trusted.client_of(request(unix, x_forwarded_for="198.51.100.4")), "198.51.100.4"
        )

    def test_site_setting_is_used(self) -> None:
        r = request(tcp("203.0.113.1"), x_forwarded_for="1.2.3.4")
        r.site = LLMProxySite(
            Resource(), clock=Clock(), max_request_size=1, trusted_proxies=self.trusted
        )
        self.assertEqual(client_ip(r), "203.0.113.1")


class SettingTests(SynchronousTestCase):
    def test_parsed_and_checked(self) -> None:
        config = Config.from_env(
            {"MANAGEMENT_TOKEN": "m", "TRUSTED_PROXIES": " 10.0.0.0/8 ,unix,::1 "}
        )
        self.assertEqual(config.trusted_proxies, ("10.0.0.0/8", "unix", "::1"))
        with self.assertRaises(ConfigError) as e:
            Config.from_env({"MANAGEMENT_TOKEN": "m", "TRUSTED_PROXIES": "10.0.0.0/8,proxy.lan"})
        self.assertIn("TRUSTED_PROXIES", str(e.exception))
        self.assertIn("'proxy.lan'", str(e.exception))
