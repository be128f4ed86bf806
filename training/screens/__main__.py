"""`python -m training.screens`: write a contact sheet of generated screens."""

from training.screens.sheet import main

raise SystemExit(main())
