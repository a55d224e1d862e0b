"""A function transform for plain text records ({"text": ...}): continue a text from a random cut.

A mixture config names this file in a dataset's ``transforms``; it is re-imported when it changes.
``rng`` is seeded once per instance, so the main sample and its in-context samples make the same draws.
Texts longer than ``WINDOW`` characters are cut to a random window so they fit short rows.
"""

WINDOW = 300


def transform(data, num_incontext, rng):
    text = data["text"] if isinstance(data, dict) else str(data)
    if len(text) > WINDOW:
        start = rng.randint(0, len(text) - WINDOW)
        text = text[start : start + WINDOW]
    text = text.replace("<", "<<")  # a literal '<' is escaped in CPM-Bee inputs
    if len(text) < 4:
        return {"input": "", "<ans>": text}
    cut = rng.randint(1, max(1, len(text) // 2))
    while cut < len(text) and text[cut - 1] == "<":
        cut += 1  # never split an escaped '<<'
    return {"input": text[:cut], "<ans>": text[cut:]}
