"""Attestation primitives: TDX quote parsing and checks, event-log replay, report_data packing."""
