"""A function transform for plain text records ({"text": ...}): continue a text from a random cut.

The mixture config names this file in a dataset's ``transforms``; it is re-imported when it changes.
``rng`` is seeded once per instance, so the main sample and its in-context samples make the same draws.
"""


def transform(data, num_incontext, rng):
    text = data["text"] if isinstance(data, dict) else str(data)
    text = text.replace("<", "<<")  # a literal '<' is escaped in CPM-Bee inputs
    if len(text) < 4:
        return {"input": "", "<ans>": text}
    cut = rng.randint(1, max(1, len(text) // 2))
    while cut < len(text) and text[cut - 1] == "<" and text[cut] == "<":
        cut += 1  # never split an escaped '<<'
    return {"input": text[:cut], "<ans>": text[cut:]}
