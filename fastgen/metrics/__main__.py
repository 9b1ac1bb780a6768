"""``python -m fastgen.metrics [DATASET ...] [--retrain] [--cache-dir DIR]``: builds (or reads) each judge and
prints what it reaches: test accuracy, floor, training and measuring times, and a real-data check (the
scores of real images the classifier never trained on)."""
import argparse
import sys

import torch

from fastgen.data import DatasetMissingError, load_dataset
from fastgen.metrics import judges
from fastgen.metrics.judges import JUDGED, Judge

CHECK_SPLIT = {"mnist": "valid", "fashion-mnist": "test", "stacked-mnist": "valid"}  # real images to score
CHECK_IMAGES = 5000  # as many as each half of the floor


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastgen.metrics", description=__doc__.split("\n\n")[0])
    parser.add_argument("datasets", nargs="*", default=list(JUDGED), help=f"of {', '.join(JUDGED)} (default: all)")
    parser.add_argument("--retrain", action="store_true", help="ignore the cached judges: train and measure again")
    parser.add_argument("--cache-dir", default=None, help="the cache folder (default: $FASTGEN_CACHE, ...)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    try:
        for name in args.datasets:
            name = judges._dataset_name(name)
            ref = judges._reference(name, judges._cache_folder(args.cache_dir), torch.device(args.device or "cpu"),
                                    not args.no_progress, retrain=args.retrain)
            rows.append(_row(Judge(ref, torch.device(args.device) if args.device else None)))
    except (ValueError, DatasetMissingError, judges.JudgeCacheError) as e:
        print(f"python -m fastgen.metrics: {e}", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; real check: the first "
          f"{CHECK_IMAGES} images of the named split")
    head = ("dataset", "modes", "test acc", "floor", "train s", "stats s", "trained now", "real check: split fd "
            "coverage kl confidence")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join(r))
    return 0


def _row(j: Judge):
    split = CHECK_SPLIT[j.dataset]
    data = load_dataset(j.dataset, split)
    s = j.score(data.images[:CHECK_IMAGES], data.labels[:CHECK_IMAGES])
    train = "-" if j.dataset in judges.BASE else f"{j.train_seconds:.0f}"
    return (j.dataset, str(j.modes), f"{100 * j.test_accuracy:.2f}%", f"{j.floor:.4g}", train,
            f"{j._ref.stats_seconds:.1f}", "yes" if j.trained else "no (cached)",
            f"{split} {s['fd']:.4g} {s['coverage']}/{s['modes']} {s['kl']:.4f} {s['confidence']:.4f} "
            f"label acc {s['label_accuracy']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
