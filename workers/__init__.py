"""The worker side of IsoBox: fork server, engine wrapper, JS prelude, confinement."""
