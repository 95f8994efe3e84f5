"""Send image files to a served melanoma model and print what it says.

    python serve/client.py --url http://127.0.0.1:5001 lesion1.jpg lesion2.png
    python serve/client.py --url http://127.0.0.1:5001 --explain --save-overlays out/ lesion.jpg

Standard library only, so it runs anywhere a client might; ``--save-overlays`` also needs numpy
and opencv-python, to put each photo beside its overlay.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path


def build_payload(paths: list[Path], explain: bool) -> dict:
    rows = [[base64.b64encode(p.read_bytes()).decode("ascii")] for p in paths]
    payload: dict = {"dataframe_split": {"columns": ["image"], "data": rows}}
    if explain:
        payload["params"] = {"explain": True}
    return payload


def predict(url: str, paths: list[Path], explain: bool = False, timeout: float = 60) -> list[dict]:
    """POST the files to ``url``/invocations; returns one dict per image."""
    request = urllib.request.Request(f"{url.rstrip('/')}/invocations",
                                     data=json.dumps(build_payload(paths, explain)).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())["predictions"]


def save_side_by_side(photo: Path, overlay_png: str, target: Path) -> None:
    """The photo beside the server's overlay (the heat map on that photo), as one PNG."""
    try:
        import cv2
        import numpy as np
    except ImportError as exc:
        raise SystemExit("error: --save-overlays needs numpy and opencv-python (pip install opencv-python)") from exc
    overlay = cv2.imdecode(np.frombuffer(base64.b64decode(overlay_png), np.uint8), cv2.IMREAD_COLOR)
    original = cv2.imdecode(np.fromfile(photo, np.uint8), cv2.IMREAD_COLOR)
    original = cv2.resize(original, (overlay.shape[1], overlay.shape[0]), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(target), np.hstack([original, overlay]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--url", default="http://127.0.0.1:5001")
    parser.add_argument("--explain", action="store_true", help="ask for Grad-CAM overlays")
    parser.add_argument("--save-overlays", type=Path, default=None,
                        help="folder for original | Grad-CAM overlay PNGs")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    explain = args.explain or args.save_overlays is not None
    try:
        rows = predict(args.url, args.images, explain)
    except urllib.error.HTTPError as exc:
        print(f"error: HTTP {exc.code}: {json.loads(exc.read()).get('message', '')}", file=sys.stderr)
        return 1
    except urllib.error.URLError as exc:
        print(f"error: cannot reach {args.url}: {exc.reason}", file=sys.stderr)
        return 1
    width = max(len(str(p)) for p in args.images)
    print(f"{'image':<{width}}  {'p(malignant)':>12}  label")
    for path, row in zip(args.images, rows):
        print(f"{str(path):<{width}}  {row['malignant_probability']:>12.3f}  {row['label']}")
        if args.save_overlays is not None and row.get("gradcam_png"):
            args.save_overlays.mkdir(parents=True, exist_ok=True)
            target = args.save_overlays / f"{path.stem}_explained.png"
            save_side_by_side(path, row["gradcam_png"], target)
            print(f"{'':<{width}}  original | overlay: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
