"""What the searches found, for people: terminal tables and JSON (`text`), report.html
(`html`), and NetAdapt's report (`nas`). Reports read results; they never measure."""
