"""Anthropic's Messages API: its wire models (`protocol`), the translations to and from the gateway's internal chat
request and stream (`translate`), the reverse ones for an Anthropic provider (`provider`) and the routes (`routes`)."""
