"""megascale-infer: disaggregated expert-parallel MoE serving."""
