"""This project's demo (``make run``): the ``demo_setup`` command. Not part of the app."""
