"""Client contract tests: the same bodies against the emulator and, with DMR_URL, a real runner."""
