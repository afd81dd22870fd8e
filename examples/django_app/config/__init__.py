"""The example project's configuration: settings, URLs, WSGI entry point."""
