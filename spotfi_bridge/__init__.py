"""spotfi-bridge: the router-side agent of the SpotFi platform."""

__version__ = "0.1.0"
