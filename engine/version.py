"""The sdtrt version: on the ground floor, so the exporter and the face read one constant."""

VERSION = "0.1.0"
