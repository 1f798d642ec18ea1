import sys

from .build import BuildError, ensure_horovod

try:
    ensure_horovod(force="--force" in sys.argv[1:])
except BuildError as err:
    print(f"hvdtrain: Horovod build failed: {err}", file=sys.stderr)
    sys.exit(1)
