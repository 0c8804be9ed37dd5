"""The micro-world: seeded RGB scenes and the text about them, in English and French.

A scene is a 2x2 grid of cells (top left, top right, bottom left, bottom right); each cell
is empty or holds a circle, square or triangle in one of four colours. Images are real
32x32 RGB pictures drawn with PIL (jittered size, position and colour); text is
whitespace-separated words from a closed vocabulary, so a word-level tokenizer covers it.

Everything here is a pure function of a `random.Random`, so every corpus and every
benchmark set is reproducible from its seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterable

from PIL import Image, ImageDraw

IMAGE_SIZE = 32
CELL = IMAGE_SIZE // 2

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven")
INSTRUCTIONS = ("capitals", "brackets", "sentence")

RGB = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 75, 215),
    "yellow": (225, 200, 35),
}

# French words (without accents; the world is a closed toy vocabulary).
FR = {
    "red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune",
    "circle": "cercle", "square": "carre", "triangle": "triangle",
    "circles": "cercles", "squares": "carres", "triangles": "triangles",
    "nothing": "rien", "yes": "oui", "no": "non",
    "zero": "zero", "one": "un", "two": "deux", "three": "trois", "four": "quatre",
    "five": "cinq", "six": "six", "seven": "sept",
    "top left": "en haut a gauche", "top right": "en haut a droite",
    "bottom left": "en bas a gauche", "bottom right": "en bas a droite",
    "answer": "reponse", "question": "question", "scene": "scene",
    "shape": "forme", "shapes": "formes", "color": "couleur",
    "what color": "quelle couleur", "what shape": "quelle forme",
    "how many": "combien de", "is there": "y a t il", "there are": "il y a",
    "plus": "plus",
}

Cell = tuple[str, str] | None  # (color, shape) or empty
Scene = tuple[Cell, Cell, Cell, Cell]


@dataclass(frozen=True)
class Item:
    """One question about one scene. `question` already holds any format instruction."""

    scene: Scene
    question: str
    answer: str
    lang: str  # "en" or "fr"
    kind: str  # color_at, shape_at, count_shape, count_color, exists, math_*, ...
    render_seed: int  # seed of the image jitter, so the picture is fixed too

    def image(self) -> Image.Image:
        return render(self.scene, random.Random(self.render_seed))


# --------------------------------------------------------------------------- scenes & images


def random_scene(rng: random.Random, p_empty: float = 0.3) -> Scene:
    cells = []
    for _ in range(4):
        if rng.random() < p_empty:
            cells.append(None)
        else:
            cells.append((rng.choice(COLORS), rng.choice(SHAPES)))
    return tuple(cells)  # type: ignore[return-value]


def render(scene: Scene, rng: random.Random) -> Image.Image:
    """Draw a scene as a 32x32 RGB image, with jittered size, position and colour."""
    bg = rng.randint(232, 255)
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (bg, bg, bg))
    draw = ImageDraw.Draw(img)
    for i, cell in enumerate(scene):
        if cell is None:
            continue
        color, shape = cell
        r, g, b = RGB[color]
        j = lambda v: max(0, min(255, v + rng.randint(-20, 20)))  # noqa: E731
        fill = (j(r), j(g), j(b))
        size = rng.randint(9, 13)
        cx = (i % 2) * CELL + CELL // 2 + rng.randint(-1, 1)
        cy = (i // 2) * CELL + CELL // 2 + rng.randint(-1, 1)
        x0, y0 = cx - size // 2, cy - size // 2
        x1, y1 = x0 + size - 1, y0 + size - 1
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(cx, y0), (x0, y1), (x1, y1)], fill=fill)
    return img


# --------------------------------------------------------------------------- words


def fr(words: str) -> str:
    """Translate an English phrase word by word (longest known phrase first)."""
    if words in FR:
        return FR[words]
    return " ".join(FR.get(w, w) for w in words.split())


def plural(shape: str) -> str:
    return shape + "s"


def describe(scene: Scene, lang: str = "en") -> str:
    """Scene description: the four cells in reading order (top left, top right, bottom left,
    bottom right), as a picture's patches are read."""
    parts = []
    for cell in scene:
        if lang == "en":
            what = "nothing" if cell is None else f"{cell[0]} {cell[1]}"
            parts.append(what)
        else:
            what = "rien" if cell is None else f"{FR[cell[1]]} {FR[cell[0]]}"
            parts.append(what)
    return " , ".join(parts)


def count_shape(scene: Scene, shape: str) -> int:
    return sum(1 for c in scene if c is not None and c[1] == shape)


def count_color(scene: Scene, color: str) -> int:
    return sum(1 for c in scene if c is not None and c[0] == color)


# --------------------------------------------------------------------------- questions


def _pick_unique(scene: Scene, rng: random.Random, key: int) -> tuple[str, str] | None:
    """A random cell whose colour (``key`` 0) or shape (``key`` 1) no other cell has; None if there is none."""
    values = [c[key] for c in scene if c is not None]
    unique = [c for c in scene if c is not None and values.count(c[key]) == 1]
    return rng.choice(unique) if unique else None


def _q_color_of(scene: Scene, rng: random.Random) -> tuple[str, str, str, str] | None:
    """Colour of the only shape of a kind ("what color is the circle ?")."""
    if (cell := _pick_unique(scene, rng, 1)) is None:
        return None
    color, shape = cell
    return (f"what color is the {shape} ?", color, f"quelle couleur a le {FR[shape]} ?", FR[color])


def _q_shape_of(scene: Scene, rng: random.Random) -> tuple[str, str, str, str] | None:
    """Shape of the only thing of a colour ("what shape is red ?")."""
    if (cell := _pick_unique(scene, rng, 0)) is None:
        return None
    color, shape = cell
    return (f"what shape is {color} ?", shape, f"quelle forme est {FR[color]} ?", FR[shape])


def _q_count_all(scene: Scene, rng: random.Random) -> tuple[str, str, str, str]:
    n = NUMBERS[sum(1 for c in scene if c is not None)]
    return ("how many shapes are there ?", n, "combien de formes y a t il ?", FR[n])


def _q_count_shape(scene: Scene, rng: random.Random) -> tuple[str, str, str, str]:
    shape = rng.choice(SHAPES)
    n = NUMBERS[count_shape(scene, shape)]
    return (f"how many {plural(shape)} are there ?", n,
            f"combien de {FR[plural(shape)]} y a t il ?", FR[n])


def _q_count_color(scene: Scene, rng: random.Random) -> tuple[str, str, str, str]:
    color = rng.choice(COLORS)
    n = NUMBERS[count_color(scene, color)]
    return (f"how many {color} shapes are there ?", n,
            f"combien de formes {FR[color]} y a t il ?", FR[n])


def _q_exists(scene: Scene, rng: random.Random) -> tuple[str, str, str, str]:
    present = [c for c in scene if c is not None]
    if present and rng.random() < 0.5:
        color, shape = rng.choice(present)
    else:
        color, shape = rng.choice(COLORS), rng.choice(SHAPES)
    yes = (color, shape) in present
    ans = "yes" if yes else "no"
    return (f"is there a {color} {shape} ?", ans, f"y a t il un {FR[shape]} {FR[color]} ?", FR[ans])


QUESTION_KINDS: dict[str, Callable] = {
    "color_of": _q_color_of,
    "shape_of": _q_shape_of,
    "count_all": _q_count_all,
    "count_shape": _q_count_shape,
    "count_color": _q_count_color,
    "exists": _q_exists,
}


def _q_math(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    k = rng.randint(1, 3)
    if rng.random() < 0.5:
        shape = rng.choice(SHAPES)
        n = count_shape(scene, shape)
        q = f"how many {plural(shape)} plus {NUMBERS[k]} ?"
        kind = "math_shape"
    else:
        color = rng.choice(COLORS)
        n = count_color(scene, color)
        q = f"how many {color} shapes plus {NUMBERS[k]} ?"
        kind = "math_color"
    return q, NUMBERS[n + k], kind


INSTRUCTION_TEXT = {
    "capitals": "answer in capitals .",
    "brackets": "answer in brackets .",
    "sentence": "answer with a full sentence .",
}


def format_answer(answer: str, instruction: str | None) -> str:
    if instruction is None:
        return answer
    if instruction == "capitals":
        return answer.upper()
    if instruction == "brackets":
        return f"[ {answer} ]"
    if instruction == "sentence":
        return f"the answer is {answer} ."
    raise ValueError(instruction)


def make_item(rng: random.Random, task: str, *, kinds: Iterable[str] | None = None,
              scene: Scene | None = None) -> Item:
    """Draw one item of a task: "en", "fr", "instruction" or "math" (on `scene` if given)."""
    kinds = tuple(kinds or QUESTION_KINDS)
    fixed = scene
    while True:
        scene = fixed if fixed is not None else random_scene(rng)
        render_seed = rng.getrandbits(32)
        if task == "math":
            q, a, kind = _q_math(scene, rng)
            return Item(scene, q, a, "en", kind, render_seed)
        kind = rng.choice(kinds)
        got = QUESTION_KINDS[kind](scene, rng)
        if got is None:
            continue
        q_en, a_en, q_fr, a_fr = got
        if task == "en":
            return Item(scene, q_en, a_en, "en", kind, render_seed)
        if task == "fr":
            return Item(scene, q_fr, a_fr, "fr", kind, render_seed)
        if task == "instruction":
            ins = rng.choice(INSTRUCTIONS)
            return Item(scene, f"{q_en} {INSTRUCTION_TEXT[ins]}", format_answer(a_en, ins), "en",
                        f"{kind}:{ins}", render_seed)
        raise ValueError(f"unknown task {task!r}")


# --------------------------------------------------------------------------- prompts

IMAGE_TOKEN = "<image>"


def answer_marker(lang: str) -> str:
    return "answer" if lang == "en" else "reponse"


def vlm_prompt(item: Item) -> str:
    """Prompt for a VLM: the picture stands where a text model reads the scene description."""
    return f"scene : {IMAGE_TOKEN} . question : {item.question} {answer_marker(item.lang)} :"


def text_prompt(item: Item, scene_lang: str | None = "en") -> str:
    """Prompt for a text-only LLM: the scene as words, or (scene_lang=None) no scene at all."""
    if scene_lang is None:
        return f"question : {item.question} {answer_marker(item.lang)} :"
    return f"scene : {describe(item.scene, scene_lang)} . question : {item.question} {answer_marker(item.lang)} :"


# --------------------------------------------------------------------------- pre-training text


def lexicon_lines() -> list[str]:
    """Bilingual lexicon, capital forms and arithmetic facts: what a base LLM 'knows'."""
    lines = []
    pairs = [(k, v) for k, v in FR.items() if k != v]
    for en, f in pairs:
        lines.append(f"{en} in french is {f} .")
        lines.append(f"{f} en anglais est {en} .")
    for w in [*COLORS, *SHAPES, "nothing", "yes", "no", *NUMBERS]:
        lines.append(f"{w} in capitals is {w.upper()} .")
    for a in range(8):
        for b in range(8 - a):
            lines.append(f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]} .")
    return lines


def statements(scene: Scene, rng: random.Random, lang: str) -> str:
    """A few true sentences about a scene."""
    out = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.5:
            shape = rng.choice(SHAPES)
            n = NUMBERS[count_shape(scene, shape)]
            out.append(f"there are {n} {plural(shape)} ." if lang == "en"
                       else f"il y a {FR[n]} {FR[plural(shape)]} .")
        else:
            color = rng.choice(COLORS)
            n = NUMBERS[count_color(scene, color)]
            out.append(f"there are {n} {color} shapes ." if lang == "en"
                       else f"il y a {FR[n]} formes {FR[color]} .")
    return " ".join(out)


def all_words() -> list[str]:
    """Every word the world can produce (the tokenizer's vocabulary), in a fixed order."""
    words: set[str] = set()
    rng = random.Random(12345)
    texts = list(lexicon_lines())
    texts += [INSTRUCTION_TEXT[i] for i in INSTRUCTIONS]
    texts += ["scene : . question : answer : reponse : the answer is [ ] en anglais"]
    for w in [*COLORS, *SHAPES, "nothing", "yes", "no", *NUMBERS]:
        texts.append(w.upper())
    for _ in range(3000):
        s = random_scene(rng)
        texts += [describe(s, "en"), describe(s, "fr"), statements(s, rng, "en"), statements(s, rng, "fr")]
        for kind, fn in QUESTION_KINDS.items():
            got = fn(s, rng)
            if got:
                texts += [got[0], got[1], got[2], got[3]]
        texts += list(_q_math(s, rng)[:2])
    for t in texts:
        words.update(t.split())
    return sorted(words)
