"""``python -m neumeta.data``: find Fashion-MNIST (or download it) and say where it is.

The Makefile runs this before ``make demo`` and ``make test``; exit status 0 means every command
of the library will find the files, 1 that they are missing (the message says where it looked).
"""
import argparse
import sys

from .fashion_mnist import find_fashion_mnist


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neumeta.data", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", help="the folder to look in, and the only one (default: "
                                           "$NEUMETA_DATA_DIR, else the Debian package's folder, ~/.cache/neumeta)")
    parser.add_argument("--no-download", action="store_true", help="only look, never download")
    parser.add_argument("--quiet", action="store_true", help="print nothing; the exit status tells")
    args = parser.parse_args(argv)
    try:
        files = find_fashion_mnist(args.data_dir, download=not args.no_download)
    except FileNotFoundError as error:
        if not args.quiet:
            print(f"error: {error}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"Fashion-MNIST: {next(iter(files.values())).parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
