"""Servants for the OMERO services a BlitzGateway login and an image writer use."""
