from sandbox.merchant_demo.app import main

main()
