"""IsoBox: run untrusted JavaScript from Python in supervised QuickJS worker processes."""
