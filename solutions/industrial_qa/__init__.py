"""Industrial QA: defect detection and line inspection (issue 6)."""
