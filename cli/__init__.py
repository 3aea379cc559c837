"""x."""


def main() -> None:
    print("hi")
