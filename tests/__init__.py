"""The test suite (docs/architecture.md, "Tests"): unit/, integration/, faults/, gpu/, and the helpers they
share in support/. A package, so that every test imports its helpers as `tests.support.<module>`."""
