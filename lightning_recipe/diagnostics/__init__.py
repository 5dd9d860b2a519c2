"""Pure diagnostics: modules, tensors and closures in; numbers and results out. No Lightning here."""
