"""Serving: requests as sequences, a continuous-batching scheduler, the engine thread, the HTTP server.

``params`` and ``sequence`` describe a request; ``scheduler`` admits and retires sequences at step
boundaries and runs one forward pass per step for every active sequence (``runner``), with the KV in
the engine's cache rows or in paged blocks with prefix reuse (``blocks``, ``paged_cache``); ``loop``
puts that on a background thread for the HTTP server (``app``, ``protocol``, ``metrics``, and the chat
page in ``static/``); ``engine.llm`` drives the same scheduler for batch jobs.
"""
