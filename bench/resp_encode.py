"""The one RESP encoder the bench's Python helpers share (standard library only)."""


def resp(*args):
    """A command as a RESP multibulk of bulk strings: resp("AUTH", user, password)."""
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a.encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out
