"""How close cls.transforms.bilinear_resize comes to OpenCV's cv2.resize(INTER_LINEAR), on real photos.

The authors' release resizes with OpenCV; this project does not depend on it. Run with an interpreter that has
both torch and cv2 importable, e.g. a throwaway venv holding opencv-python-headless added to the path:

    python scripts/measure_opencv_resize.py --cv2-path /tmp/cv2venv/lib/python3.X/site-packages [IMAGES...]

For every image it resizes the way the authors' pipeline does (shorter side to 256; a 224 x 224 resize of a
smaller square crop, i.e. upscaling; and of a larger one, i.e. downscaling) and prints the max and mean absolute
difference in gray levels over all pixels and channels, and the share of values that differ at all, for
``bilinear_resize`` (OpenCV's fixed-point arithmetic emulated) and, for comparison, for the same formula in float
(``F.interpolate(mode="bilinear", align_corners=False, antialias=False)`` rounded half up).
"""
import argparse
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_IMAGES = "/usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco/JPEGImages"


def cases(height: int, width: int) -> dict[str, tuple[tuple[int, int, int, int], tuple[int, int]]]:
    """name -> ((top, left, crop height, crop width), (out height, out width))."""
    short = min(height, width)
    long_out = int(256 / short * max(height, width) + 0.5)
    eval_size = (256, long_out) if height < width else (long_out, 256)
    return {
        "eval: shorter side 256": ((0, 0, height, width), eval_size),
        "train: 150px square -> 224 (up)": ((17, 23, 150, 150), (224, 224)),
        "train: min(short, 400)px square -> 224 (down)": ((0, 0, min(short, 400), min(short, 400)), (224, 224)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help=f"image files or folders (default: {DEFAULT_IMAGES})")
    parser.add_argument("--cv2-path", default="", help="a site-packages folder holding cv2, appended to sys.path")
    args = parser.parse_args()
    if args.cv2_path:
        sys.path.append(args.cv2_path)
    try:
        import cv2
    except ImportError:
        print("cv2 is not importable: pip install opencv-python-headless somewhere and pass --cv2-path", file=sys.stderr)
        return 2
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from cls.transforms import bilinear_resize, pil_to_uint8

    paths = []
    for entry in args.images or [DEFAULT_IMAGES]:
        entry = pathlib.Path(entry)
        paths += sorted(p for p in entry.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")) if entry.is_dir() else [entry]
    if not paths:
        print("no images found", file=sys.stderr)
        return 2
    print(f"cv2 {cv2.__version__}, torch {torch.__version__}, {len(paths)} images")
    totals: dict[str, list] = {}
    for path in paths:
        image = pil_to_uint8(Image.open(path))
        for name, ((top, left, h, w), (out_h, out_w)) in cases(*image.shape[1:]).items():
            crop = image[:, top:top + h, left:left + w].contiguous()
            ours = bilinear_resize(crop, (out_h, out_w)).permute(1, 2, 0).numpy().astype(np.int16)
            theirs = cv2.resize(np.ascontiguousarray(crop.permute(1, 2, 0).numpy()), (out_w, out_h),
                                interpolation=cv2.INTER_LINEAR).astype(np.int16)
            in_float = F.interpolate(crop[None].float(), size=(out_h, out_w), mode="bilinear", align_corners=False,
                                     antialias=False)
            in_float = torch.floor(in_float[0] + 0.5).clamp(0, 255).permute(1, 2, 0).numpy().astype(np.int16)
            for method, result in (("bilinear_resize", ours), ("float interpolate", in_float)):
                diff = np.abs(result - theirs)
                totals.setdefault((name, method), []).append(diff.ravel())
                print(f"{path.name:18s} {name:46s} {method:18s} max {diff.max()}  mean {diff.mean():.5f}  "
                      f"differing {np.mean(diff > 0):.3%}")
    for (name, method), diffs in totals.items():
        diff = np.concatenate(diffs)
        print(f"{'ALL':18s} {name:46s} {method:18s} max {diff.max()}  mean {diff.mean():.5f}  differing {np.mean(diff > 0):.3%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
