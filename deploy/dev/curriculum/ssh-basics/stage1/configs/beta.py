import os
with open("motd.txt", "w") as f:
    f.write("beta: stage 1\n")
with open("history.txt", "a") as f:
    f.write("stage 1\n")
print("configured beta for stage 1 in", os.getcwd())
