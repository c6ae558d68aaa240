"""The demo project: a small blog served over ASGI (see ``examples/demo/README.md``)."""
