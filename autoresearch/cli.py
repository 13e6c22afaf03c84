def main():
    raise SystemExit("autoresearch: not implemented yet")
