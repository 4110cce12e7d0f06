"""`python -m layerskip ...` (also what `torchrun -m layerskip train ...` runs)."""
from layerskip.cli import main

raise SystemExit(main())
