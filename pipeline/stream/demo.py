"""The demo producer: batches of the shapes world written into a stream source.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.stream.sources import READY_MARKER


def write_demo_batches(
    cfg, folder: str | Path, n_batches: int | None = None, only_next: bool = False, flat: bool = False
) -> list[str]:
    """Write the shapes demo world into ``folder`` as batches of classes; return the new batches.

    Batch k holds the classes of the benchmark's task k (same seed, same images), under
    ``batch-NNN/train|test/<class>/`` (or ``<class>/`` with ``flat``: the stream's hash
    split then decides). ``_READY`` is written last. With ``only_next``, one batch per call:
    the one after the highest-numbered batch in the folder.
    """
    from pipeline.data import shapes as shapes_world
    from pipeline.data.split import make_split

    world = cfg.dataset.shapes
    classes = shapes_world.class_names(world.colors, world.shapes)
    split = make_split(classes, n_batches or cfg.split.n_tasks, cfg.seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    # A producer moves on: --next writes the batch after the last one it wrote, even when
    # consumed batches have since been deleted from the folder.
    last = max((int(p.parent.name.removeprefix("batch-")) for p in folder.glob(f"batch-[0-9][0-9][0-9]/{READY_MARKER}")), default=0)
    for number, task in enumerate(split["tasks"], 1):
        batch = f"batch-{number:03d}"
        if (folder / batch / READY_MARKER).exists() or (only_next and number <= last):
            continue
        for label in task:
            name = classes[label]
            color, shape = name.split(" ", 1)
            for part, count in (("train", world.train_per_class), ("test", world.test_per_class)):
                target = folder / batch / (name.replace(" ", "_") if flat else f"{part}/{name.replace(' ', '_')}")
                target.mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    rng = shapes_world.sample_rng(world.seed, part, label, i)
                    image = shapes_world.draw(color, shape, world.image_size, rng, world.noise)
                    image.save(target / f"{part}-{i:05d}.png", optimize=False, compress_level=1)
        (folder / batch / READY_MARKER).write_text("")
        written.append(batch)
        if only_next:
            break
    return written
