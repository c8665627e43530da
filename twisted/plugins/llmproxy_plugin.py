from twisted.application.service import ServiceMaker

llmproxy = ServiceMaker(
    "llmproxy",
    "llmproxy.tap",
    "LLM provider proxy with short-lived, revocable tokens.",
    "llmproxy",
)
