"""Test peers for the end-to-end tests: a real mosquitto, a real agent process, a subscriber."""
