"""OFFSIDE data: the release-format loader, dataset builders, the synthetic benchmark."""
