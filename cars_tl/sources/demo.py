"""A small, deterministic, generated stand-in for Stanford Cars (``cars-tl download --source demo``).

Same layout and devkit files as the real dataset, so every stage runs on it unchanged: six classes
(real Stanford Cars names, the one with a slash included), each a distinct body colour and
silhouette drawn on a noisy background, with the car's box inside the image. With random weights
and generated images the numbers only show that the chain works, not how good a model is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cars_tl.data.devkit import IMAGE_DIRS, write_devkit

DEMO_CLASSES = (
    "AM General Hummer SUV 2000",
    "Acura RL Sedan 2012",
    "Ram C/V Cargo Van Minivan 2012",
    "Chevrolet Corvette Convertible 2012",
    "Ford F-150 Regular Cab 2012",
    "Volvo XC90 SUV 2007",
)
_COLOURS = ((200, 40, 40), (40, 160, 60), (40, 70, 200), (230, 200, 30), (150, 60, 170), (30, 190, 200))
_CABIN = (0.55, 0.35, 0.75, 0.2, 0.3, 0.6)  # cabin height relative to body, per class


def _draw_car(rng: np.random.Generator, label: int, size: tuple[int, int]):
    from PIL import Image, ImageDraw

    width, height = size
    background = rng.integers(90, 170, size=(height, width, 3), dtype=np.uint8)
    background = (background * 0.5 + np.linspace(60, 140, width)[None, :, None]).astype(np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    car_w = int(width * rng.uniform(0.5, 0.8))
    car_h = int(height * rng.uniform(0.35, 0.5))
    x1 = int(rng.integers(1, width - car_w - 1))
    y1 = int(rng.integers(1, height - car_h - 1))
    x2, y2 = x1 + car_w, y1 + car_h
    colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in _COLOURS[label])
    cabin_h = int(car_h * _CABIN[label] * 0.6)
    body_top = y1 + cabin_h
    wheel = max(2, car_h // 5)
    draw.rectangle((x1, body_top, x2, y2 - wheel), fill=colour)
    draw.rectangle((x1 + car_w // 4, y1, x2 - car_w // 4, body_top), fill=tuple(c // 2 for c in colour))
    for cx in (x1 + car_w // 5, x2 - car_w // 5):
        draw.ellipse((cx - wheel, y2 - 2 * wheel, cx + wheel, y2), fill=(20, 20, 20))
    # Devkit boxes are 1-based and inclusive.
    return image, (x1 + 1, y1 + 1, x2 + 1, y2 + 1)


def generate_demo(root: Path, train_per_class: int = 24, test_per_class: int = 12, seed: int = 0) -> None:
    """Write the demo dataset into ``root`` (a ``stanford_cars`` directory), deterministically."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        folder = root / IMAGE_DIRS[split]
        folder.mkdir(parents=True, exist_ok=True)
        order = [label for label in range(len(DEMO_CLASSES)) for _ in range(per_class)]
        for number, label in enumerate(rng.permutation(order).tolist(), start=1):
            size = (int(rng.integers(96, 161)), int(rng.integers(72, 121)))
            image, box = _draw_car(rng, label, size)
            fname = f"{number:05d}.jpg"
            image.save(folder / fname, quality=90)
            rows[split].append({"fname": fname, "box": box, "label": label})
    write_devkit(root, DEMO_CLASSES, rows["train"], rows["test"])
