"""The monitoring dashboard: retained status from the broker, live in a browser.

`server-ingest --config dashboard.json dashboard` serves it. It subscribes to the retained
status topics with its own read-only broker identity and pushes every change to the page
over Server-Sent Events; the page is hand-written HTML, CSS and JavaScript with no build step.
"""
