import os
with open("motd.txt", "w") as f:
    f.write("beta: stage 2\n")
with open("history.txt", "a") as f:
    f.write("stage 2\n")
print("configured beta for stage 2 in", os.getcwd())
