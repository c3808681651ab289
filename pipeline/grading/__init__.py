"""Is a completion right: final-answer extraction and comparison, verifiers of the working."""
