"""A built-in language-modelling task on real text shipped with Python: the language reference.

    topics  the topics of `pydoc_data.topics`, cut at paragraph ends into chunks

The split is by topic name (a hash, never by order), so it is disjoint and stable.
"""

from __future__ import annotations

from pydoc_data.topics import topics

from lorakit.tasks.splits import in_fraction


def topics_rows(chunk_chars: int = 800, test_fraction: float = 0.2, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test) rows {"text"}: pydoc topics cut at paragraph ends into ~chunk_chars pieces, split by topic.

    Topics quote each other ("compound" holds "if", "try"...), so a paragraph is used once only and a
    test topic drops every paragraph that a training topic also has.
    """
    def paragraphs(name: str) -> list[str]:
        return [p.strip() for p in topics[name].split("\n\n") if p.strip()]

    names = sorted(topics)
    in_test = {n: in_fraction(n, test_fraction, seed) for n in names}
    seen = {p for n in names if not in_test[n] for p in paragraphs(n)}  # training paragraphs
    used: set[str] = set()
    train, test = [], []
    for name in names:
        chunk, pieces = "", []
        for p in paragraphs(name):
            if p in used or (in_test[name] and p in seen):
                continue
            used.add(p)
            if chunk and len(chunk) + len(p) > chunk_chars:
                pieces.append(chunk)
                chunk = ""
            chunk = f"{chunk}\n\n{p}" if chunk else p
        if chunk:
            pieces.append(chunk)
        (test if in_test[name] else train).extend({"text": piece[: chunk_chars * 2]} for piece in pieces)
    return train, test
