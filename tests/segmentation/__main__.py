"""`python -m tests.segmentation` (what `make segmentation` runs): the campaign, its report."""

from tests.segmentation.campaign import main

raise SystemExit(main())
