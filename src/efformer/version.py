"""The package version (a leaf module, so that low layers can record it)."""

VERSION = "0.1.0"
