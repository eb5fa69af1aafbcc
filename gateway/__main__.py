from gateway.cli import main

# Guarded: the vLLM engine starts its engine core by spawning a process that re-imports __main__.
if __name__ == "__main__":
    main()
