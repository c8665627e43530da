from twisted.application.service import ServiceMaker

llmproxy_dispatcher = ServiceMaker(
    "llmproxy dispatcher",
    "llmproxy.events.dispatcher_tap",
    "Deliver llmproxy's events from Redis Streams to a file, webhook, Helicone or Lunary.",
    "llmproxy-dispatcher",
)
