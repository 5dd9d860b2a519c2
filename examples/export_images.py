"""Export the images and figures lightning_recipe logged to TensorBoard as PNG files, e.g. to attach them
to a CI job or a report.

    python examples/export_images.py recipe_logs/quickstart/version_0 out_dir [--last-only]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def export(log_dir: str, out_dir: str, last_only: bool = False) -> list[Path]:
    events = EventAccumulator(log_dir, size_guidance={"images": 0})
    events.Reload()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for tag in events.Tags()["images"]:
        if not tag.startswith("recipe/"):
            continue
        images = events.Images(tag)
        for image in images[-1:] if last_only else images:
            path = out / f"{tag.removeprefix('recipe/').replace('/', '__')}__step{image.step}.png"
            path.write_bytes(image.encoded_image_string)
            written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--last-only", action="store_true", help="only the last image of each tag")
    args = parser.parse_args()
    for path in export(args.log_dir, args.out_dir, args.last_only):
        print(path)


if __name__ == "__main__":
    main()
