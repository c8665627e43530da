from twisted.application.service import ServiceMaker

llmproxy_fake_upstream = ServiceMaker(
    "llmproxy fake upstream",
    "llmproxy.testing.fake_upstream_tap",
    "A fake OpenAI-compatible API server for tests.",
    "llmproxy-fake-upstream",
)
