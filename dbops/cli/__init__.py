"""The command line. Commands parse, call one operation, render; no boto3/psycopg here."""
