"""Caption text for a shapes scene, each caption with the structured claims it states."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from gcr.data.shapes.scenes import COLORS, Claims, Scene, dominant_relation, pick

CAPTIONS_PER_IMAGE = 5

_KIND_WORDS = {
    "circle": ("circle", "circle", "disc"),
    "square": ("square", "square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross", "cross", "plus sign"),
    "diamond": ("diamond", "diamond", "rhombus"),
    "hexagon": ("hexagon",),
}
_THING_WORDS = ("shape", "shape", "object", "figure")
_COLOR_WORDS = {c: (c,) for c in COLORS} | {"purple": ("purple", "violet"), "cyan": ("cyan", "turquoise")}
_SIZE_WORDS = {
    "small": ("small", "small", "little", "tiny"),
    "medium": ("medium", "medium sized", "mid sized"),
    "large": ("large", "large", "big", "huge"),
}
_BG_COLOR_WORDS = {
    "white": ("white",),
    "black": ("black", "dark"),
    "gray": ("gray", "grey"),
    "beige": ("beige",),
}
_TEXTURE_ADJ = {
    "plain": ("plain", "solid", "flat"),
    "striped": ("striped", "stripy"),
    "dotted": ("dotted", "spotted", "polka dot"),
    "checkered": ("checkered", "checkerboard", "checked"),
    "noisy": ("noisy", "grainy", "speckled"),
    "gradient": ("gradient", "shaded", "fading"),
}
_TEXTURE_NOUN = {
    "striped": ("stripes",),
    "dotted": ("dots", "spots"),
    "checkered": ("a checkerboard pattern", "checks"),
    "noisy": ("noise", "grain"),
    "gradient": ("a gradient", "shading"),
}
_BG_NOUNS = ("background", "background", "backdrop")
_REL_WORDS = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over", "higher than"),
    "below": ("below", "under", "beneath", "lower than"),
}
_REL_IT = {
    "left": ("to its left",),
    "right": ("to its right",),
    "above": ("above it",),
    "below": ("below it", "under it"),
}
_COUNT_WORDS = {1: ("one", "a single"), 2: ("two", "a pair of"), 3: ("three",)}

# How often a mentioned shape is described by each attribute; tuned for ~5-30% ambiguous test captions
# on the 1000-image default (see caption_ambiguity).
_P_KIND, _P_COLOR, _P_SIZE, _P_SIZE_ALONE = 0.9, 0.85, 0.4, 0.6
_P_BACKGROUND = 0.5


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _pick_attrs(obj: dict[str, Any], rng: random.Random, p_size: float = _P_SIZE) -> dict[str, str]:
    keys = [k for k, p in (("kind", _P_KIND), ("color", _P_COLOR)) if rng.random() < p]
    if not keys:
        keys = [pick(rng, ("kind", "color"))]
    if rng.random() < p_size:
        keys.append("size")
    return {k: obj[k] for k in ("kind", "color", "size") if k in keys}


def _noun_phrase(desc: dict[str, str], rng: random.Random) -> str:
    noun = pick(rng, _KIND_WORDS[desc["kind"]]) if "kind" in desc else pick(rng, _THING_WORDS)
    size = pick(rng, _SIZE_WORDS[desc["size"]]) + " " if "size" in desc else ""
    color = pick(rng, _COLOR_WORDS[desc["color"]]) if "color" in desc else ""
    form = rng.random() if color else 0.0
    if form < 0.7:
        phrase = f"{size}{color + ' ' if color else ''}{noun}"
    elif form < 0.8:
        phrase = f"{size}{noun} that is {color}"
    elif form < 0.9:
        phrase = f"{size}{color} colored {noun}"
    else:
        phrase = f"{size}{noun} in {color}"
    return _a(phrase)


def _background_phrase(scene: Scene, rng: random.Random, claims: Claims, *, with_ok: bool = True) -> str:
    """A phrase like "a gray striped background"; records what it states in ``claims``."""
    which = pick(rng, ("both", "both", "both", "color", "texture"))
    noun = pick(rng, _BG_NOUNS)
    color = pick(rng, _BG_COLOR_WORDS[scene["background"]])
    texture = scene["texture"]
    if which != "texture":
        claims["background"] = scene["background"]
    if which != "color":
        claims["texture"] = texture
    if which == "color":
        return _a(f"{color} {noun}")
    if with_ok and which == "both" and texture in _TEXTURE_NOUN and rng.random() < 0.3:
        return _a(f"{color} {noun} with {pick(rng, _TEXTURE_NOUN[texture])}")
    adj = pick(rng, _TEXTURE_ADJ[texture])
    if which == "texture":
        return _a(f"{adj} {noun}")
    return _a(f"{color} {adj} {noun}" if rng.random() < 0.6 else f"{adj} {color} {noun}")


def _maybe_background(
    scene: Scene, rng: random.Random, claims: Claims, p: float = _P_BACKGROUND, *, with_ok: bool = True
) -> str:
    if rng.random() >= p:
        return ""
    return f" {pick(rng, ('on', 'on', 'against', 'over'))} {_background_phrase(scene, rng, claims, with_ok=with_ok)}"


def _describe(objs: Sequence[dict[str, Any]], rng: random.Random, claims: Claims) -> list[dict[str, str]]:
    # A lone shape is named more precisely: a caption about one shape must still single out its image.
    p_size = _P_SIZE_ALONE if len(objs) == 1 else _P_SIZE
    descs = [_pick_attrs(o, rng, p_size) for o in objs]
    claims["objects"] = descs
    return descs


def _caption_exists(scene: Scene, rng: random.Random) -> tuple[str, Claims]:
    claims: Claims = {}
    (desc,) = _describe([pick(rng, scene["objects"])], rng, claims)
    a = _noun_phrase(desc, rng)
    bg = _maybe_background(scene, rng, claims, p=0.85)
    template = pick(rng, ("there is {a}{bg}", "{a}{bg}", "an image of {a}{bg}", "a picture showing {a}{bg}",
                           "{a} is shown{bg}", "you can see {a}{bg}"))  # fmt: skip
    return template.format(a=a, bg=bg), claims


def _caption_relation(scene: Scene, rng: random.Random) -> tuple[str, Claims]:
    claims: Claims = {}
    a_obj, b_obj = rng.sample(scene["objects"], 2)
    rel = dominant_relation(a_obj, b_obj)
    da, db = _describe([a_obj, b_obj], rng, claims)
    claims["relations"] = [[0, rel, 1]]
    b = _noun_phrase(db, rng)
    style = rng.random()
    if style < 0.15 and "kind" in da and "color" in da:
        # "a small square, blue, sits right of a big red disc"
        head = _noun_phrase({k: v for k, v in da.items() if k != "color"}, rng)
        return (
            f"{head}, {pick(rng, _COLOR_WORDS[da['color']])}, sits {pick(rng, _REL_WORDS[rel])} {b}",
            claims,
        )
    if style < 0.3:
        bg = _maybe_background(scene, rng, claims, with_ok=False)
        return f"{b} with {_noun_phrase(da, rng)} {pick(rng, _REL_IT[rel])}{bg}", claims
    verb = pick(rng, ("", "", " is", " sits", " appears"))
    return (
        f"{_noun_phrase(da, rng)}{verb} {pick(rng, _REL_WORDS[rel])} {b}{_maybe_background(scene, rng, claims)}",
        claims,
    )


def _caption_list(scene: Scene, rng: random.Random) -> tuple[str, Claims]:
    claims: Claims = {}
    objs = list(scene["objects"])
    rng.shuffle(objs)
    phrases = [_noun_phrase(d, rng) for d in _describe(objs, rng, claims)]
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    n = len(objs)
    if n == 1:
        claims["count"] = 1
        text = pick(rng, ("a single shape: {l}", "just one shape, {l}", "only {l}", "one shape only: {l}"))
    elif rng.random() < 0.75:
        claims["count"] = n
        text = f"{pick(rng, _COUNT_WORDS[n])} {pick(rng, ('shapes', 'objects', 'figures'))}: {{l}}"
    else:
        text = "{l}"
    return text.format(l=listed) + _maybe_background(scene, rng, claims, p=0.4), claims


def _caption_background_first(scene: Scene, rng: random.Random) -> tuple[str, Claims]:
    claims: Claims = {}
    bg = _background_phrase(scene, rng, claims, with_ok=False)
    (desc,) = _describe([pick(rng, scene["objects"])], rng, claims)
    a = _noun_phrase(desc, rng)
    if rng.random() < 0.3:
        n = len(scene["objects"])
        claims["count"] = n
        noun = "shape" if n == 1 else "shapes"
        return (
            f"{pick(rng, _COUNT_WORDS[n])} {noun} on {bg}, including {a}" if n > 1 else f"{a} alone on {bg}",
            claims,
        )
    template = pick(rng, ("{bg} with {a}", "{bg} with {a} on it", "on {bg}, {a}", "{a} in front of {bg}"))
    return template.format(bg=bg, a=a), claims


_FAMILIES: tuple[tuple[Callable[[Scene, random.Random], tuple[str, Claims]], float, int], ...] = (
    # (family, weight, least number of shapes it needs)
    (_caption_exists, 0.2, 1),
    (_caption_relation, 0.35, 2),
    (_caption_list, 0.25, 1),
    (_caption_background_first, 0.2, 1),
)


def caption_scene(
    scene: Scene, rng: random.Random, k: int = CAPTIONS_PER_IMAGE
) -> list[tuple[str, Claims]]:
    """``k`` captions of ``scene`` with their claims, distinct where possible."""
    families = [(f, w) for f, w, need in _FAMILIES if len(scene["objects"]) >= need]
    out: list[tuple[str, Claims]] = []
    seen: set[str] = set()
    for _ in range(20 * k):
        if len(out) == k:
            break
        family = rng.choices([f for f, _ in families], weights=[w for _, w in families])[0]
        text, claims = family(scene, rng)
        if text not in seen:
            seen.add(text)
            out.append((text, claims))
    while len(out) < k:  # only for scenes with very few possible captions
        out.append(_caption_list(scene, rng))
    return out
