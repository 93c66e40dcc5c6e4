"""magic-init command line (placeholder until the initialization lands)."""
import sys


def main() -> int:
    print("magic-init: the initialization command is not available yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
