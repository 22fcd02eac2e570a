"""Bounds and training signals over the traced model: intervals (IBP), the Double Margin
triple, and the linear (CROWN-family) bounds in dense and windowed (patch) form."""
