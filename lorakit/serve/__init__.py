"""Serving many adapters over one frozen base: `lorakit serve`.

    engine.py    continuous batching: requests join and leave between decode steps, one adapter per row
    registry.py  adapters from a directory: loaded on first use, LRU-evicted under a byte budget
    app.py       OpenAI-shaped HTTP API (FastAPI), SSE streaming, metrics, the chat page at /
    page.py      the character-chat page (plain HTML + JS)
    cli.py       `lorakit serve` arguments → uvicorn
    demo.py      `lorakit demo`: train character adapters on SmolLM2, then serve them

The HTTP parts need the `serve` extra (fastapi, uvicorn); the engine and registry need only torch.
"""
