"""`python -m vas_server serve ...`, the same as `vas-server serve ...`."""

from vas_server.cli import main

if __name__ == "__main__":
    main()
