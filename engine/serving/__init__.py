"""Serving: requests as sequences, a continuous-batching scheduler, the engine thread, the HTTP server.

``params`` and ``sequence`` describe a request; ``scheduler`` admits and retires sequences at step
boundaries and runs one forward pass per step for every active sequence (``runner``); ``loop`` puts
that on a background thread for the HTTP server (``app``); ``engine.llm`` drives it for batch jobs.
"""
