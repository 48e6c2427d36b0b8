"""Pure checkers: math answer extraction and equivalence."""
