import sys
from pathlib import Path

import mlx_musicgen  # noqa: F401  (loads the optimized BLAS before anything imports mlx)

sys.path.insert(0, str(Path(__file__).parent))
